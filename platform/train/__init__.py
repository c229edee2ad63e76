"""Training one trial: the loop, the models, the cost meters, checkpoints and the metrics of R.

Importing this package imports nothing: ``clgrid.train.metrics`` (numpy only) serves the report
without pulling in torch.
"""
