"""The five stages of the pipeline, each a separately deployable package."""
