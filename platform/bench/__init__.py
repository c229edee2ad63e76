"""``clgrid bench``: the platform's own costs, measured against plain loops in one run."""
