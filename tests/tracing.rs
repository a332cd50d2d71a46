//! OpenTelemetry: a Verify with a W3C `traceparent` produces a span in the
//! caller's trace, exported over OTLP/gRPC to a receiver on loopback.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_span_continues_the_callers_trace() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let endpoint = format!("http://{otlp}");
    let sidecar =
        Sidecar::start(&["--dev"], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "100")]);
    let key = sidecar.keys_json(&["create", "--name", "traced"])["key"].as_str().unwrap().to_string();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut client = keystile::proto::verifier_client::VerifierClient::connect(sidecar.server()).await.unwrap();
    let mut req = tonic::Request::new(verify_req(&key));
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse().unwrap());
    let resp = client.verify(req).await.unwrap().into_inner();
    assert_eq!(code(&resp), keystile::proto::Code::Valid);

    let deadline = Instant::now() + Duration::from_secs(10);
    let span = loop {
        let found = receiver.0.lock().unwrap().iter().find(|s| hex(&s.trace_id) == trace_id).cloned();
        if let Some(s) = found {
            break s;
        }
        assert!(Instant::now() < deadline, "no span of trace {trace_id} reached the collector");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(span.name, "keystile.v1.Verifier/Verify");
    assert_eq!(hex(&span.parent_span_id), "00f067aa0ba902b7", "child of the caller's span");
    let code_attr = span.attributes.iter().find(|a| a.key == "keystile.code").expect("the verdict is on the span");
    assert!(format!("{:?}", code_attr.value).contains("valid"));
    assert!(!format!("{span:?}").contains(&key[17..49]), "no secret in the span");
    sidecar.terminate();
    server.abort();
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
