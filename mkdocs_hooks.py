"""MkDocs hook (mkdocs.yml ``hooks:``): drop the test options of code fences before rendering.

The docs' code blocks carry pytest-markdown-docs options after the language
(```` ```python continuation ````); Python-Markdown's fenced code takes only the language, so
the options are removed from the page's Markdown before MkDocs renders it (GitHub already
ignores them).
"""

from __future__ import annotations

import re

_FENCE_OPTIONS = re.compile(r"^(?P<fence>[ \t]*(?:```+|~~~+)[ \t]*(?P<lang>[\w#.+-]+))[ \t]+[^\n`]*$", re.MULTILINE)


def on_page_markdown(markdown: str, **kwargs) -> str:
    return _FENCE_OPTIONS.sub(lambda match: match.group("fence"), markdown)
