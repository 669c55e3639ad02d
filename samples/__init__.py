"""Runnable end-to-end examples; each module has ``build() -> (model, example_inputs)`` and ``main()``."""
