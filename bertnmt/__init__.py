"""bertnmt: BERT-fused neural machine translation (Zhu et al., ICLR 2020).

``bertnmt.load_model(path)`` restores a :class:`~bertnmt.inference.translator.Translator` from an exported
folder, a checkpoint or a run directory; ``bertnmt.export_model(run_or_checkpoint, out_dir)``
writes such a folder. Both are imported on first use, so ``import bertnmt`` stays light.
"""

from bertnmt.core import __version__

__all__ = ["Translator", "__version__", "export_model", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from bertnmt.inference.loading import load_model

        return load_model
    if name == "export_model":
        from bertnmt.recipe.export import export_model

        return export_model
    if name == "Translator":
        from bertnmt.inference.translator import Translator

        return Translator
    raise AttributeError(f"module 'bertnmt' has no attribute {name!r}")
