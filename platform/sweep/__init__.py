"""A sweep on disk and on Ray: the folder layout, the Ray Tune driver, the trial, and the commands
that work on a sweep's folder (sync, reap, resume, jobs).

Importing this package imports nothing: ``clgrid.sweep.sync`` must not pull in Ray or torch.
"""
