"""One module per pipeline step. Each exposes ``run(spec, *, report, run_uri, <paths>)``
returning a :class:`~kubeloop_pipelines.contract.StepResult`; the KFP components in
``components.py`` call it through :func:`~kubeloop_pipelines.step_runner.run_step`, which parses
the spec and creates the :class:`~kubeloop_pipelines.progress.StepReport`. Signatures (paths are
``pathlib.Path``)::

    ingest.run(spec, *, report, run_uri, dataset_dir)
    preprocess.run(spec, *, report, run_uri, raw_dir, prepared_dir, report_html)
    tune.run(spec, *, report, run_uri, prepared_dir, params_path, report_html)
    train.run(spec, *, report, run_uri, prepared_dir, params_path, model_dir, curves_html)
    optimize.run(spec, *, report, run_uri, prepared_dir, model_dir, optimized_dir, report_html)
    evaluate.run(spec, *, report, run_uri, prepared_dir, model_dir, evaluation_path, report_html)
    explain.run(spec, *, report, run_uri, prepared_dir, model_dir, report_html)
    register.run(spec, *, report, run_uri, raw_dir, model_dir, evaluation_path, manifest_path)

Pipeline order: ingest → preprocess → [tune] → train → [optimize] → evaluate → [explain]
→ register (only when evaluate's ``outputs["gates_passed"]`` is true).
"""
