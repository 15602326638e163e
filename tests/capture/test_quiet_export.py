"""torch diagnostics pyrys reads nothing from stay out of the log while it exports (``ir/quiet_fake.py``)."""
import logging

import torch

import pyrys
from pyrys.ir.quiet_fake import UNREDUCED


class _Heard(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_torch_exports_unreduced_inequalities_warning_is_quiet_while_pyrys_exports(monkeypatch):
    """A helper's find: symbolic image sizes (SqueezeNet, MobileViT) printed torch.export's "Failed to reduce
    inequalities" with a traceback on stderr, for a suggestion pyrys never reads; the capture went on."""
    logger, export, heard = logging.getLogger("torch.fx.experimental.symbolic_shapes"), torch.export.export, _Heard()

    def noisy(*args, **kwargs):
        logger.warning(UNREDUCED)
        logger.warning("another warning")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", noisy)
    logger.addHandler(heard)
    try:
        pyrys.optimize(torch.nn.Linear(4, 4).eval(), (torch.rand(2, 4),), backend="reference")
        assert heard.messages == ["another warning"]
        logger.warning(UNREDUCED)  # anyone else's export still hears it
        assert heard.messages == ["another warning", UNREDUCED]
    finally:
        logger.removeHandler(heard)
