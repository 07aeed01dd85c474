"""What runs inside Ray actors: the controller, the rank actors, the engine and the models."""
