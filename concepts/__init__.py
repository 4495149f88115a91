"""Concepts and neurons, through the neuron database: where the live model meets the descriptions.

The engine (:mod:`engine`) knows no database and the database (:mod:`cache`) knows no model;
code that needs both lives here:

* :mod:`concepts.resolve`: a steering spec ("Bible verses", suppress 500) → neurons →
  interventions (select → union → quantiles → check), and the database's activation view;
* :mod:`concepts.lint`: the concept linter's database side (descriptions of a trace's
  important neurons, the spurious-flag calibration) and the optional LLM cluster labels;
* :mod:`concepts.cli`: the ``experiment`` command line (``python -m engine experiment …``).
"""
