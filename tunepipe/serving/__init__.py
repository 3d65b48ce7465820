"""After training: finding and loading a saved model or adapter safely (no code from folders), predicting with one
model or many adapters on one base, the HTTP server, and merging an adapter into its base."""
