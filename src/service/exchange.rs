//! `keystile.v1.TokenExchange`: converts the request, asks
//! [`crate::token::exchange`], answers the token (README, "Token
//! exchange"). The HTTP listener's `POST /v1/auth/token` does the same.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status;
use crate::auth::Authenticator;
use crate::proto;
use crate::token::Tokens;
use crate::token::exchange::{ExchangeRequest, exchange};

pub struct ExchangeService {
    auth: Arc<Authenticator>,
    tokens: Arc<Tokens>,
}

impl ExchangeService {
    pub fn new(auth: Arc<Authenticator>, tokens: Arc<Tokens>) -> ExchangeService {
        ExchangeService { auth, tokens }
    }

    pub fn into_server(self) -> proto::token_exchange_server::TokenExchangeServer<Self> {
        proto::token_exchange_server::TokenExchangeServer::new(self).max_decoding_message_size(super::MAX_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl proto::token_exchange_server::TokenExchange for ExchangeService {
    async fn exchange(
        &self,
        request: Request<proto::ExchangeRequest>,
    ) -> Result<Response<proto::ExchangeResponse>, Status> {
        let peer = super::fairness::peer_ip(&request);
        let msg = request.into_inner();
        let req = ExchangeRequest {
            secret: &msg.secret,
            email: &msg.email,
            scopes: &msg.scopes,
            ttl_seconds: msg.ttl_seconds,
            peer,
        };
        let issued = exchange(&self.auth, &self.tokens, &req).await.map_err(|e| status::from_exchange(&e))?;
        Ok(Response::new(proto::ExchangeResponse {
            token: issued.token.expose().to_string(),
            expires_in: issued.expires_in,
            token_type: "Bearer".into(),
        }))
    }
}
