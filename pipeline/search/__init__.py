"""The budgeted search (`pipeline search`): space, feasibility before training, Ray Tune trials, report."""
from pipeline.failures import InputError


class SearchError(InputError):
    """The search cannot run as asked; the message names the option and the fix."""
