"""User-level jobs and the ``medseg`` CLI. Dask scheduling of cases and folds lives here."""
