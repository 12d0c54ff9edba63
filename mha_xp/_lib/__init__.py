"""Private helpers: namespaces, devices, dtypes and portable math."""
