//! `RedisStore` (feature `redis`): one limit shared by every app server. Work in progress.
