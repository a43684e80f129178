"""The report: a static feature-forest browser (the paper's Figure 1 as a site) and the paper's
figures. ``build`` writes the site, ``stats`` and ``semantic_view`` count what it shows (firing,
co-firing, top labels, link scores), ``figures`` and ``scale_figure`` draw,
``make.build_report`` does all of it.
Imports ``hsae_core.evaluation``, ``hsae_core.model`` and ``hsae_core.common``.
"""
