"""Fakes at the process boundary, for services that cannot run on a test machine.

Each fake is a real server on 127.0.0.1 speaking the real wire protocol, so the code under test
uses its real client library; only what is behind the API (databases, schedulers, clusters) is
replaced by a small in-memory model that the test drives.
"""
