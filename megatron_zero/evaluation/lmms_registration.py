"""lmms-eval's registration record for ``megatron_zero_vlm``, importable without loading the adapter.

lmms-eval loads ``lmms_eval.models`` entry points while its model registry is still being built, so the entry
point must not import the adapter (which imports the registry); the registry imports the class lazily, by path::

    entry_points={"lmms_eval.models": ["megatron_zero_vlm = megatron_zero.evaluation.lmms_registration:model_manifest"]}
"""
MODEL_NAME = "megatron_zero_vlm"
CLASS_PATH = "megatron_zero.evaluation.vlm_adapter.MegatronZeroVLM"


def model_manifest():
    """The ``ModelManifest`` lmms-eval's registry takes (the entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)
