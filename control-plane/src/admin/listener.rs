//! The admin API's listener: TLS connections whose client presented an operator
//! certificate of this mesh ([`crate::tls::Port::Admin`]), handed to axum together
//! with the operator they authenticated as.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use meshd_ca::OperatorId;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

use crate::identity::CertManager;
use crate::tls::{self, Port, TlsSetupError};

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone)]
pub struct OperatorConn {
    pub peer: SocketAddr,
    pub operator: OperatorId,
}

pub struct AdminListener {
    connections: tls::Incoming,
}

impl AdminListener {
    pub fn new(listener: TcpListener, certs: Arc<CertManager>) -> Result<Self, TlsSetupError> {
        Ok(AdminListener {
            connections: tls::incoming(listener, certs, Port::Admin)?,
        })
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = TlsStream<TcpStream>;
    type Addr = OperatorConn;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tls, peer) = tls::next_connection(&mut self.connections).await;
            // The handshake admitted only operators; this cannot fail.
            if let Some(operator) = tls::peer_operator(&tls) {
                return (tls, OperatorConn { peer, operator });
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Err(std::io::Error::other(
            "the admin listener's address is not an operator connection",
        ))
    }
}

impl Connected<IncomingStream<'_, AdminListener>> for OperatorConn {
    fn connect_info(stream: IncomingStream<'_, AdminListener>) -> Self {
        stream.remote_addr().clone()
    }
}
