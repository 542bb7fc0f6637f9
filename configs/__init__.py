"""The shipped run configs (presets), installed as ``mtcmkd.presets``.

``--config NAME`` accepts a preset's name (``mtcmkd``, ``baseline``, ...) as well as a path;
``mtcmkd inspect`` without ``--config`` lists them (:func:`mtcmkd.config.preset_names`).
"""
