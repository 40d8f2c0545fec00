"""Process titles, so that ps and top show each process's role (``pyswtask: worker 0``).

setproctitle rewrites the argv area that ps reads; prctl(PR_SET_NAME) would only change the
15-character command name, which ``ps aux`` does not show. It knows nothing of roles: each
role passes its own title.
"""

from __future__ import annotations

from setproctitle import setproctitle


def set_title(role: str) -> None:
    setproctitle(f"pyswtask: {role}")
