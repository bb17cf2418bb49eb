"""What a run measured and how it is shown: typed stage records, processing_summary.json and the events
log, query privacy, progress lines, memory probes and readable renderings."""
