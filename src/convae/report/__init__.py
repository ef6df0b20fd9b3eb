"""The HTML report: a model card and every view of a run in one self-contained file.

build.py            build_report / write_report: the sections, rendered through the template
card.py             the model card's tables
templates/          report.html, the page (Jinja2, autoescaped)
"""

from __future__ import annotations

from .build import CSP, ReportResult, Section, build_report, write_report

__all__ = ["CSP", "ReportResult", "Section", "build_report", "write_report"]
