"""The machine learning of the pipeline, plain Python (no KFP): data, preprocessing, models,
training, tuning, evaluation, explanation and optimisation."""
