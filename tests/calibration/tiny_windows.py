"""The calibration tests' sizes (imported by name: `conftest` is ambiguous when several test folders run in
one process). The tiny model's windows are 64 tokens and the simulated server's block size 32, so every
window spans two blocks and the window rule (R = 16) and kivi key groups (G_t = 16) all take effect."""

BLOCK = 32
SEQ_LEN = 64
TEXT_CHARS = 60_000  # enough for the windows below; tokenizing all 465k characters takes seconds
