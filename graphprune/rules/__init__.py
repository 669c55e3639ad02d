"""Per-op constraint rules: how each operator couples the dims of its tensors.

``registry`` holds the rule tables' machinery, ``common`` the couplings both tables share,
``aten`` and ``onnx`` the tables of the two frontends (importing one fills it), ``modules``
the torch modules that hold sizes.
"""
