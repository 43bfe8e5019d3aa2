"""The cohort engine: a round's clients trained as one batched computation.

:mod:`~smallfed.cohort.stacked` runs G parameter copies of a model in one pass,
:mod:`~smallfed.cohort.trainer` trains a cohort with it step for step as the clients
would train one after another, and :mod:`~smallfed.cohort.rendezvous` lets the
in-process Grid's ClientApp calls meet there. Turn it on with ``cohort-size``.
"""
