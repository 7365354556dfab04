"""The bus seam: where the relay publishes and loaders read (Redis Streams; NATS JetStream and RabbitMQ next).

`seam.py` holds the protocol every bus implements; one module per bus
implements it (`redis.py`); `connect.py` picks the module by the URL's scheme.
"""
