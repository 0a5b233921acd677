"""aidc trainer runtime: torchrun entry, composable training loop, encrypted verified checkpoints.

Public, stable API for other components (the model server imports these):

- ``aidc_trainer.crypto``: ``KeyRing``, ``MissingKeyError``, ``WrongKeyError``, ``CheckpointCorruptError``
- ``aidc_trainer.checkpoint``: ``load_latest``, ``load_checkpoint``, ``list_checkpoints``, ``verify``,
  ``build_model_from_manifest``, ``LoadedCheckpoint``
"""

__version__ = "0.1.0"
