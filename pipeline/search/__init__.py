"""The budgeted search (`pipeline search`): space, feasibility before training, Ray Tune trials, report."""
