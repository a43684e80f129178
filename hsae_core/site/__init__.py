"""The report: a static feature-forest browser (the paper's Figure 1 as a site) and the paper's
figures. ``build`` writes the site, ``figures`` draws, ``make.build_report`` does both.
Imports ``hsae_core.evaluation``, ``hsae_core.model`` and ``hsae_core.common``.
"""
