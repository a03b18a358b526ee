# Helpers shared by the rule files.
def canonical(value):
    """A config section with its keys sorted, recursively. Snakemake compares params by their repr, so without
    this, reordering keys in a config file would rerun a stage whose settings did not change."""
    if isinstance(value, dict):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [canonical(item) for item in value]
    return value
