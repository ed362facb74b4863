"""The day side: chat with retrieval, sleep triggers, evaluation and the day-night cycle."""
