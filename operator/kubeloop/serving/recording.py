"""Monitoring data a served version records: the feedback store (labels joined by request id,
``serving/feedback.py``) and the request log (sampled rows and their labels as Parquet under the
tenant's prefix, ``serving/request_log.py``).

``attach`` is called once a version is loaded; it adds the recorders the options ask for.
"""

from __future__ import annotations

from kubeloop.serving.feedback import FeedbackStore, LabelSink
from kubeloop.serving.predictor import Predictor, Recorder, ServingOptions
from kubeloop.serving.request_log import RequestLog


def attach(predictor: Predictor, options: ServingOptions) -> None:
    """Add the feedback store (always: it answers the feedback route) and, when
    ``options.request_log_uri`` is set, the request log (which also keeps matched labels).

    Raises ValueError naming the option for settings that can never work (a sample rate
    outside 0..1, a URI scheme without a filesystem); a store that refuses writes is not an
    error here: its rows are counted as dropped.
    """
    model = predictor.model
    recorders: list[Recorder] = []
    sinks: list[LabelSink] = []
    if options.request_log_uri:
        request_log = RequestLog(
            options.request_log_uri,
            model=predictor.name,
            version=predictor.version,
            task=model.task,
            features=model.features,
            classes=model.classes,
            sample=options.request_log_sample,
            max_rows=options.request_log_max_rows,
            roll_interval_s=options.request_log_flush_s,
        )
        recorders.append(request_log)
        sinks.append(request_log)
    feedback = FeedbackStore(
        predictor.name,
        predictor.version,
        task=model.task,
        classes=model.classes,
        ttl_s=options.feedback_ttl_s,
        sinks=sinks,
    )
    predictor.add_recorders([feedback, *recorders])
    predictor.feedback = feedback
