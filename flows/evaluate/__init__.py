"""`janusflow eval`: GenEval-style generation scores, understanding accuracy, feature-space
Frechet distance and prompt-image agreement of a saved model."""
