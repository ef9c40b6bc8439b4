"""The machine learning of the pipeline, plain Python (no KFP): data, models, training, tuning, evaluation, explanation, optimisation."""
