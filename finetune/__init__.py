"""moetune's model and training half. `import finetune` registers the built-in architecture."""

from finetune import modeling as _modeling  # noqa: F401  (registers the Auto classes)
from finetune.errors import MoetuneError


def load_model(spec, *, dtype=None, device_map=None, trust_remote_code=False, allow_pickle=False):
    """MODEL spec -> (model, tokenizer_or_processor). See `finetune.loading.load_model`."""
    from finetune.loading import load_model as _load

    return _load(
        spec,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )


__all__ = ["MoetuneError", "load_model"]
