"""Before any worker starts: the run's plan. ``prepare`` checks the recipe against the model and
the data (``layout``), fills the DeepSpeed config (``ds_config``), runs the data audit (``gate``)
and writes the run directory with its lineage (``lineage``)."""
