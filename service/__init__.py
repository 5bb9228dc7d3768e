"""notify-ws: a WebSocket push gateway fed by Kafka, with a PostgreSQL backlog for offline users."""
