//! Serves an axum app over real HTTP on a free loopback port, with peer addresses.

use std::net::SocketAddr;

use axum::Router;

/// Binds 127.0.0.1:0, serves `app` in the background with `ConnectInfo`, returns the address.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}
