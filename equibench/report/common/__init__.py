"""What every report section shares: number formatting, the metric catalogue as the report reads
it, plots, the page model rendered by the jinja2 templates, and the per-task tables."""
