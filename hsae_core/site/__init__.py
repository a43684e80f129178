"""The report (issue 6): a static feature-forest browser (the paper's Figure 1 as a site) and the
paper's figures. ``build`` writes the site, ``figures`` draws, ``make.build_report`` does both."""
