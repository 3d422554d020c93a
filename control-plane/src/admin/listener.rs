//! The admin API's listener: TLS connections whose client presented an operator
//! certificate of this mesh ([`crate::tls::Port::Admin`]), handed to axum together
//! with the operator they authenticated as.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use futures::StreamExt;
use meshd_ca::OperatorId;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::CertManager;
use crate::tls::{self, Port, TlsSetupError};

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone)]
pub struct OperatorConn {
    pub peer: SocketAddr,
    pub operator: OperatorId,
}

pub struct AdminListener {
    connections: ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>,
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
            match self.connections.next().await {
                Some(Ok(tls)) => {
                    let Ok(peer) = tls.get_ref().0.peer_addr() else {
                        continue;
                    };
                    // The handshake admitted only operators; this cannot fail.
                    let Some(operator) = tls::peer_operator(&tls) else {
                        continue;
                    };
                    return (tls, OperatorConn { peer, operator });
                }
                Some(Err(_)) => continue,
                // The acceptor stopped: serve nothing more.
                None => std::future::pending::<()>().await,
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
