"""Building blocks below the metrics: the model-file format and the small networks of the
learned metrics.

:mod:`itreg.blocks.modelfile` writes and reads model files (configuration + weights, loaded
with ``weights_only=True``) and rebuilds modules from them through a registry of model kinds;
:mod:`~itreg.blocks.critics` holds the critics of the neural MI/KL estimators (MINE,
KLDivNet), :mod:`~itreg.blocks.ditr` DITR's patch classifier and :mod:`~itreg.blocks.deepsim`
DeepSim's feature extractors. :mod:`itreg.metrics` uses them; the registration networks, which
use metrics as losses, live above in :mod:`itreg.nets`.
"""
