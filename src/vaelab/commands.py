"""Commands vaelab prints for a user to paste (`Next: python evaluate.py run=...`), written so
that the shell and Hydra's override grammar read back the same path: a sweep's run dir is named
`3_latent_dim=8,beta=1`, and `run=` followed by that, unquoted, is a Hydra syntax error (`=`) or
a sweep over two values (`,`).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

#: what Hydra reads as part of an unquoted value and the shell leaves alone
PLAIN = re.compile(r"[A-Za-z0-9_\-+./:~@%]+")


def override(key: str, value: str | Path) -> str:
    """`key=value` as one shell word that Hydra parses back to exactly `value`: as it is when
    plain, else Hydra-quoted ("...": a quote escaped, and backslashes doubled where they precede
    a quote or the closing one, as Hydra's grammar reads them) and shell-quoted."""
    text = str(value)
    if PLAIN.fullmatch(text):
        return f"{key}={text}"
    quoted = re.sub(r'(\\*)("|$)', lambda m: m[1] * 2 + ('\\"' if m[2] else ""), text)
    return shlex.quote(f'{key}="{quoted}"')


def path(value: str | Path) -> str:
    """A path as one shell word (for a command's own arguments, e.g. `tensorboard --logdir`)."""
    return shlex.quote(str(value))
