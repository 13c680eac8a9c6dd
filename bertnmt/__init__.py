"""bertnmt: BERT-fused neural machine translation (Zhu et al., ICLR 2020).

``bertnmt.load_model(path)`` restores a :class:`~bertnmt.translator.Translator` from an exported
folder, a checkpoint or a run directory; ``bertnmt.export_model(run_or_checkpoint, out_dir)``
writes such a folder. Both are imported on first use, so ``import bertnmt`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["Translator", "export_model", "load_model"]


def __getattr__(name: str):
    if name in ("load_model", "export_model"):
        from bertnmt import export

        return getattr(export, name)
    if name == "Translator":
        from bertnmt.translator import Translator

        return Translator
    raise AttributeError(f"module 'bertnmt' has no attribute {name!r}")
