"""The ground floor: config, errors, console and logging, labels, device, file helpers, the run folder's layout."""
