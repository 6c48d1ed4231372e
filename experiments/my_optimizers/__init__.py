"""Example user optimizers for ``gptfn train --optimizer my_optimizers.lamb:lamb`` and
``experiments/optimizer_track.py``: a module with a function that takes the learning-rate
schedule (and, by keyword, any run options it names) and returns a GradientTransformation."""
