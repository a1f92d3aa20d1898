//! `custodian-loadgen`: a small, dependency-light HTTP load generator for Custodian's FHIR
//! REST API.
//!
//! It runs two phases back to back against one server, each with a fixed number of
//! concurrent workers sharing a single keep-alive HTTP/1.1 connection pool:
//!
//! 1. **create** — every worker loops `POST {base}/Patient` with a freshly generated,
//!    realistic Patient (identifier, name, telecom, address, gender, birthDate all vary per
//!    request). It sends no `Prefer` header, so the server returns its default
//!    representation: this is the path ordinary clients take. A request succeeds on
//!    `201 Created` with a `Location` of the form `{base}/Patient/{id}/_history/{vid}`; the
//!    ids are collected for the next phase.
//! 2. **read** — every worker loops `GET {base}/Patient/{id}` for ids picked at random from
//!    those created, expecting `200 OK`.
//!
//! Each phase first runs a warm-up (connections opened, caches and the database's pages
//! warmed) whose requests are not counted, then measures for the requested duration. As in
//! `wrk`, a request counts when it both started and finished inside the measurement window,
//! and throughput is those requests divided by the window's length. Requests still in flight
//! when the window closes are abandoned and reported as `unfinished` (not as errors): waiting
//! for them would let one stuck request stretch the window and distort the throughput.
//! Latency percentiles are over successful requests only, so fast error responses cannot
//! make a broken server look quick; failures are counted by HTTP status, or by `timeout` /
//! `connect` / `transport` when no response arrived.
//!
//! Output is a human-readable table, or with `--json` one JSON object per phase per line
//! (flat keys, so shell scripts can pick fields out). The process exits with status 1 when a
//! phase's error rate exceeds 1 % or a phase measured nothing, so a benchmark script notices
//! a broken server instead of publishing its numbers.
//!
//! ```text
//! custodian-loadgen --base-url http://127.0.0.1:8080 --concurrency 32 --duration-secs 10 \
//!     [--warmup-secs 2] [--token TOKEN] [--json]
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use hdrhistogram::Histogram;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The media type FHIR R4 defines for its JSON format.
const FHIR_JSON: &str = "application/fhir+json";

/// A phase whose failed share of requests exceeds this fails the whole run.
const MAX_ERROR_RATE: f64 = 0.01;

/// The histogram's range: 1 µs up to an hour, which no request with a sane timeout reaches.
/// Three significant figures keep every sub-millisecond latency exact to the microsecond.
const HISTOGRAM_MAX_MICROS: u64 = 3_600 * 1_000_000;
const HISTOGRAM_SIGNIFICANT_FIGURES: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "custodian-loadgen",
    version,
    about = "Load generator for Custodian's FHIR REST API: creates then reads Patients and reports throughput and latency percentiles"
)]
struct Args {
    /// Base URL of the FHIR server, e.g. http://127.0.0.1:8080 (`/Patient` is appended).
    #[arg(long)]
    base_url: String,

    /// Number of concurrent workers (and at most as many pooled connections).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    concurrency: u32,

    /// Measured length of each phase, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    duration_secs: u64,

    /// Unmeasured warm-up before each phase, in seconds.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,

    /// Bearer token sent as `Authorization: Bearer TOKEN` on every request.
    #[arg(long, env = "CUSTODIAN_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// A request that takes longer than this many seconds counts as a `timeout` error.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_secs: u64,

    /// Print one JSON object per phase (one per line) instead of a table.
    #[arg(long)]
    json: bool,
}

/// What the workers of one phase do.
enum Workload {
    CreatePatients,
    ReadPatients { ids: Arc<Vec<String>> },
}

impl Workload {
    fn phase_name(&self) -> &'static str {
        match self {
            Workload::CreatePatients => "create",
            Workload::ReadPatients { .. } => "read",
        }
    }
}

/// Everything the workers share for the whole run.
struct LoadContext {
    client: reqwest::Client,
    patient_url: String,
    /// Distinguishes this run's generated identifiers from those of earlier runs against the
    /// same database, so every medical record number stays unique.
    run_tag: String,
    /// Seeds the per-worker random generators; differs per run.
    run_seed: u64,
}

/// Instants bounding the measured part of a phase.
#[derive(Clone, Copy)]
struct MeasurementWindow {
    measure_from: Instant,
    stop_at: Instant,
}

/// How a single request ended.
enum RequestOutcome {
    Created {
        id: String,
    },
    Read,
    /// The error category: an HTTP status code, or a transport-level failure kind.
    Failed {
        kind: String,
    },
}

/// What one worker observed; merged into a [`PhaseReport`] when the phase ends.
struct WorkerTally {
    latencies_micros: Histogram<u64>,
    requests: u64,
    errors_by_kind: BTreeMap<String, u64>,
    /// Measured requests abandoned because the window closed before they finished.
    unfinished: u64,
    /// Ids created by this worker, warm-up included: they all exist on the server.
    created_ids: Vec<String>,
}

impl WorkerTally {
    fn new() -> Self {
        WorkerTally {
            latencies_micros: new_latency_histogram(),
            requests: 0,
            errors_by_kind: BTreeMap::new(),
            unfinished: 0,
            created_ids: Vec::new(),
        }
    }
}

fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_MICROS, HISTOGRAM_SIGNIFICANT_FIGURES)
        .expect("constant histogram bounds are valid")
}

/// The measured result of one phase.
struct PhaseReport {
    phase: &'static str,
    concurrency: u32,
    measured: Duration,
    requests: u64,
    errors_by_kind: BTreeMap<String, u64>,
    unfinished: u64,
    latencies_micros: Histogram<u64>,
}

impl PhaseReport {
    fn errors(&self) -> u64 {
        self.errors_by_kind.values().sum()
    }

    fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors() as f64 / self.requests as f64
        }
    }

    fn throughput_per_sec(&self) -> f64 {
        let secs = self.measured.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// Latency at `quantile` in milliseconds, or `None` when no request succeeded.
    fn latency_ms_at(&self, quantile: f64) -> Option<f64> {
        (!self.latencies_micros.is_empty())
            .then(|| micros_to_ms(self.latencies_micros.value_at_quantile(quantile)))
    }

    fn max_latency_ms(&self) -> Option<f64> {
        (!self.latencies_micros.is_empty()).then(|| micros_to_ms(self.latencies_micros.max()))
    }

    /// Why this phase should fail the run, if it should.
    fn failure_reason(&self) -> Option<String> {
        if self.requests == 0 {
            Some(format!(
                "{}: no request completed in the measured window",
                self.phase
            ))
        } else if self.error_rate() > MAX_ERROR_RATE {
            Some(format!(
                "{}: error rate {:.2} % exceeds {:.0} % ({} of {} requests failed)",
                self.phase,
                self.error_rate() * 100.0,
                MAX_ERROR_RATE * 100.0,
                self.errors(),
                self.requests
            ))
        } else {
            None
        }
    }

    /// One flat JSON object; scripts read fields like `"throughput_rps":1234.5` with sed.
    fn to_json(&self) -> Value {
        json!({
            "phase": self.phase,
            "concurrency": self.concurrency,
            "measured_secs": round3(self.measured.as_secs_f64()),
            "requests": self.requests,
            "errors": self.errors(),
            "error_rate": round6(self.error_rate()),
            "throughput_rps": round3(self.throughput_per_sec()),
            "p50_ms": self.latency_ms_at(0.50).map(round3),
            "p90_ms": self.latency_ms_at(0.90).map(round3),
            "p99_ms": self.latency_ms_at(0.99).map(round3),
            "max_ms": self.max_latency_ms().map(round3),
            "unfinished": self.unfinished,
            "errors_by_status": self.errors_by_kind,
        })
    }
}

fn micros_to_ms(micros: u64) -> f64 {
    micros as f64 / 1_000.0
}

fn round3(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

fn round6(value: f64) -> f64 {
    (value * 1_000_000.0).round() / 1_000_000.0
}

/// SplitMix64: a tiny, fast, well-distributed generator. Load generation needs variety, not
/// cryptographic strength, and this keeps the dependency list to what the workspace shares.
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound`; the modulo bias is irrelevant at these bounds.
    fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

// Name and address pools. Non-ASCII names are deliberate: real registries hold them, and the
// server's JSON and storage paths must carry UTF-8 intact.
const GIVEN_NAMES: &[&str] = &[
    "Amelia",
    "Noah",
    "Olivia",
    "Liam",
    "Aisha",
    "Mateo",
    "Yuki",
    "Chloé",
    "Oluwaseun",
    "Sofía",
    "Dmitri",
    "Priya",
    "Mohammed",
    "Hannah",
    "Kwame",
    "Inès",
    "Lucas",
    "Mei",
    "Arjun",
    "Freya",
];
const FAMILY_NAMES: &[&str] = &[
    "Smith",
    "García",
    "Nguyen",
    "Okafor",
    "Müller",
    "Kowalski",
    "Haddad",
    "Tanaka",
    "O'Brien",
    "Johansson",
    "Patel",
    "Rossi",
    "Novák",
    "Mensah",
    "Kim",
    "Fernández",
];
const STREET_NAMES: &[&str] = &[
    "Main St",
    "Oak Ave",
    "Maple Dr",
    "Cedar Ln",
    "Elm St",
    "Washington Blvd",
    "Lakeview Rd",
    "Hillcrest Way",
    "Park Pl",
    "River Rd",
];
/// (city, state, postal code) triples that belong together.
const CITIES: &[(&str, &str, &str)] = &[
    ("Springfield", "IL", "62701"),
    ("Portland", "OR", "97205"),
    ("Austin", "TX", "78701"),
    ("Madison", "WI", "53703"),
    ("Burlington", "VT", "05401"),
    ("Boulder", "CO", "80302"),
    ("Savannah", "GA", "31401"),
    ("Ann Arbor", "MI", "48104"),
];
const AREA_CODES: &[&str] = &["217", "503", "512", "608", "802", "303", "912", "734"];

/// Builds one realistic Patient. Every request gets a unique medical record number and
/// email, and a random name, birth date, gender and address.
fn generate_patient(
    rng: &mut SplitMix64,
    run_tag: &str,
    worker_index: usize,
    sequence: u64,
) -> Value {
    let given = rng.pick(GIVEN_NAMES);
    let middle = rng.pick(GIVEN_NAMES);
    let family = rng.pick(FAMILY_NAMES);
    let (city, state, postal_code) = rng.pick(CITIES);
    let medical_record_number = format!("MRN-{run_tag}-{worker_index:03}-{sequence:08}");
    // 555-0100..555-0199 is the range reserved for fictional North American numbers.
    let phone = format!("+1 {} 555-01{:02}", rng.pick(AREA_CODES), rng.below(100));
    let email = format!(
        "patient.{}@example.org",
        medical_record_number.to_ascii_lowercase()
    );
    // Days 1–28 are valid in every month, so no calendar logic is needed.
    let birth_date = format!(
        "{:04}-{:02}-{:02}",
        1930 + rng.below(90),
        1 + rng.below(12),
        1 + rng.below(28)
    );
    // Weighted like a real population: mostly male/female, occasionally other/unknown.
    let gender = match rng.below(100) {
        0..=47 => "female",
        48..=95 => "male",
        96..=97 => "other",
        _ => "unknown",
    };
    let street = format!("{} {}", 1 + rng.below(9_999), rng.pick(STREET_NAMES));

    json!({
        "resourceType": "Patient",
        "identifier": [{
            "use": "usual",
            "type": {
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                    "code": "MR",
                    "display": "Medical record number"
                }]
            },
            "system": "http://hospital.example.org/identifiers/mrn",
            "value": medical_record_number
        }],
        "active": true,
        "name": [{
            "use": "official",
            "family": family,
            "given": [given, middle]
        }],
        "telecom": [
            { "system": "phone", "value": phone, "use": "home" },
            { "system": "email", "value": email, "use": "home" }
        ],
        "gender": gender,
        "birthDate": birth_date,
        "address": [{
            "use": "home",
            "type": "physical",
            "line": [street],
            "city": city,
            "state": state,
            "postalCode": postal_code,
            "country": "US"
        }]
    })
}

/// Extracts the logical id from a `Location` such as `{base}/Patient/{id}/_history/{vid}`
/// (absolute or relative). Returns `None` unless the id is a valid FHIR id.
fn patient_id_from_location(location: &str) -> Option<&str> {
    let after_type = match location.strip_prefix("Patient/") {
        Some(rest) => rest,
        None => location.rsplit_once("/Patient/")?.1,
    };
    let id = after_type.split('/').next()?;
    let is_valid_fhir_id = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.');
    is_valid_fhir_id.then_some(id)
}

/// Names a failure that produced no HTTP response.
fn transport_failure_kind(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else {
        "transport"
    };
    kind.to_owned()
}

/// Sends a prepared request and classifies the response. The body is always read to the
/// end: that is part of the latency a client sees, and it lets the connection be reused.
async fn execute(request: reqwest::RequestBuilder, workload: &Workload) -> RequestOutcome {
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) => {
            return RequestOutcome::Failed {
                kind: transport_failure_kind(&error),
            }
        }
    };
    let status = response.status();
    let created_id = response
        .headers()
        .get(LOCATION)
        .and_then(|location| location.to_str().ok())
        .and_then(patient_id_from_location)
        .map(str::to_owned);
    if let Err(error) = response.bytes().await {
        return RequestOutcome::Failed {
            kind: transport_failure_kind(&error),
        };
    }

    let failed_with_status = || RequestOutcome::Failed {
        kind: status.as_u16().to_string(),
    };
    match workload {
        Workload::CreatePatients if status == StatusCode::CREATED => match created_id {
            Some(id) => RequestOutcome::Created { id },
            // Without an id the resource cannot be read back: the server broke the contract.
            None => RequestOutcome::Failed {
                kind: "201-without-valid-location".to_owned(),
            },
        },
        Workload::ReadPatients { .. } if status == StatusCode::OK => RequestOutcome::Read,
        _ => failed_with_status(),
    }
}

/// One worker's loop: build a request (outside the timed section), send it, and record it
/// when it both started and finished inside the measurement window. Returns when the window
/// closes, dropping (and so cancelling) any request still in flight.
async fn run_worker(
    context: Arc<LoadContext>,
    workload: Arc<Workload>,
    worker_index: usize,
    window: MeasurementWindow,
) -> WorkerTally {
    let phase_salt = match *workload {
        Workload::CreatePatients => 0x0C,
        Workload::ReadPatients { .. } => 0x0D,
    };
    let mut rng = SplitMix64::new(context.run_seed ^ ((worker_index as u64) << 8) ^ phase_salt);
    let mut tally = WorkerTally::new();

    for sequence in 0u64.. {
        if Instant::now() >= window.stop_at {
            break;
        }
        let request = match &*workload {
            Workload::CreatePatients => {
                let patient = generate_patient(&mut rng, &context.run_tag, worker_index, sequence);
                let body = serde_json::to_vec(&patient).expect("a JSON value always serializes");
                context
                    .client
                    .post(&context.patient_url)
                    .header(CONTENT_TYPE, FHIR_JSON)
                    .body(body)
            }
            Workload::ReadPatients { ids } => {
                let id = rng.pick(ids);
                context
                    .client
                    .get(format!("{}/{}", context.patient_url, id))
            }
        };

        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(window.stop_at);
        let outcome = tokio::time::timeout_at(deadline, execute(request, &workload)).await;
        let finished = Instant::now();
        let started_in_window = started >= window.measure_from;
        // The timer may fire a little late, so also check the finish time: a request that
        // ended after the window closed is unfinished, exactly as if the timer had cut it.
        let finished_in_window = finished <= window.stop_at;

        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(_window_closed) => {
                if started_in_window {
                    tally.unfinished += 1;
                }
                break;
            }
        };
        if let RequestOutcome::Created { id } = &outcome {
            // Kept whether counted or not: the Patient exists either way.
            tally.created_ids.push(id.clone());
        }
        if !started_in_window {
            continue; // warm-up
        }
        if !finished_in_window {
            tally.unfinished += 1;
            break;
        }

        tally.requests += 1;
        match outcome {
            RequestOutcome::Created { .. } | RequestOutcome::Read => {
                record_latency(&mut tally.latencies_micros, finished - started);
            }
            RequestOutcome::Failed { kind } => {
                *tally.errors_by_kind.entry(kind).or_insert(0) += 1;
            }
        }
    }
    tally
}

fn record_latency(histogram: &mut Histogram<u64>, latency: Duration) {
    // Sub-microsecond responses are impossible over TCP, but clamp to the histogram's floor.
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

/// Runs one phase: warm-up, then measurement. Returns the report and every id created.
async fn run_phase(
    context: &Arc<LoadContext>,
    workload: Workload,
    args: &Args,
) -> (PhaseReport, Vec<String>) {
    let phase = workload.phase_name();
    let workload = Arc::new(workload);
    eprintln!(
        "custodian-loadgen: {phase}: {} workers, {} s warm-up, {} s measured",
        args.concurrency, args.warmup_secs, args.duration_secs
    );

    let phase_start = Instant::now();
    let measure_from = phase_start + Duration::from_secs(args.warmup_secs);
    let window = MeasurementWindow {
        measure_from,
        stop_at: measure_from + Duration::from_secs(args.duration_secs),
    };
    let workers: Vec<_> = (0..args.concurrency as usize)
        .map(|worker_index| {
            tokio::spawn(run_worker(
                Arc::clone(context),
                Arc::clone(&workload),
                worker_index,
                window,
            ))
        })
        .collect();

    let mut report = PhaseReport {
        phase,
        concurrency: args.concurrency,
        measured: window.stop_at - window.measure_from,
        requests: 0,
        errors_by_kind: BTreeMap::new(),
        unfinished: 0,
        latencies_micros: new_latency_histogram(),
    };
    let mut created_ids = Vec::new();
    for worker in workers {
        let tally = worker.await.expect("a load worker panicked");
        report.requests += tally.requests;
        report.unfinished += tally.unfinished;
        for (kind, count) in tally.errors_by_kind {
            *report.errors_by_kind.entry(kind).or_insert(0) += count;
        }
        report
            .latencies_micros
            .add(&tally.latencies_micros)
            .expect("histograms with identical bounds always merge");
        created_ids.extend(tally.created_ids);
    }
    (report, created_ids)
}

fn build_client(args: &Args) -> Result<reqwest::Client, String> {
    let mut default_headers = HeaderMap::new();
    default_headers.insert(ACCEPT, HeaderValue::from_static(FHIR_JSON));
    if let Some(token) = &args.token {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the bearer token contains characters not allowed in a header")?;
        authorization.set_sensitive(true);
        default_headers.insert(AUTHORIZATION, authorization);
    }
    reqwest::Client::builder()
        .default_headers(default_headers)
        // One keep-alive connection per worker, all reused: the benchmark measures the
        // server, not TCP handshakes.
        .http1_only()
        .pool_max_idle_per_host(args.concurrency as usize)
        .tcp_nodelay(true)
        // The target is a local server; an HTTP_PROXY in the environment must not reroute it.
        .no_proxy()
        .timeout(Duration::from_secs(args.request_timeout_secs))
        .build()
        .map_err(|error| format!("cannot build the HTTP client: {error}"))
}

/// A per-run seed and tag; the clock and the process id keep concurrent runs apart.
fn run_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0);
    SplitMix64::new(nanos ^ u64::from(std::process::id()).rotate_left(32)).next_u64()
}

fn format_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.3}"))
}

fn print_table(reports: &[PhaseReport]) {
    println!(
        "{:<7} {:>9} {:>7} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9}",
        "phase", "requests", "errors", "error%", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for report in reports {
        println!(
            "{:<7} {:>9} {:>7} {:>6.2}% {:>10.1} {:>9} {:>9} {:>9} {:>9}",
            report.phase,
            report.requests,
            report.errors(),
            report.error_rate() * 100.0,
            report.throughput_per_sec(),
            format_ms(report.latency_ms_at(0.50)),
            format_ms(report.latency_ms_at(0.90)),
            format_ms(report.latency_ms_at(0.99)),
            format_ms(report.max_latency_ms()),
        );
    }
    for report in reports.iter().filter(|report| report.errors() > 0) {
        let breakdown: Vec<String> = report
            .errors_by_kind
            .iter()
            .map(|(kind, count)| format!("{kind} ×{count}"))
            .collect();
        println!("{} errors: {}", report.phase, breakdown.join(", "));
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // An error only means a provider is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let base_url = args.base_url.trim_end_matches('/').to_owned();
    if let Err(error) = reqwest::Url::parse(&base_url) {
        eprintln!("custodian-loadgen: invalid --base-url {base_url:?}: {error}");
        return ExitCode::from(2);
    }
    let client = match build_client(&args) {
        Ok(client) => client,
        Err(message) => {
            eprintln!("custodian-loadgen: {message}");
            return ExitCode::from(2);
        }
    };
    let seed = run_seed();
    let context = Arc::new(LoadContext {
        client,
        patient_url: format!("{base_url}/Patient"),
        run_tag: format!("{:08x}", seed >> 32),
        run_seed: seed,
    });

    let mut reports = Vec::new();
    let (create_report, created_ids) = run_phase(&context, Workload::CreatePatients, &args).await;
    reports.push(create_report);
    if created_ids.is_empty() {
        eprintln!("custodian-loadgen: no Patient was created, so the read phase is skipped");
    } else {
        let ids = Arc::new(created_ids);
        let (read_report, _) = run_phase(&context, Workload::ReadPatients { ids }, &args).await;
        reports.push(read_report);
    }

    if args.json {
        for report in &reports {
            println!("{}", report.to_json());
        }
    } else {
        print_table(&reports);
    }

    let mut failures: Vec<String> = reports
        .iter()
        .filter_map(PhaseReport::failure_reason)
        .collect();
    if reports.len() < 2 {
        failures.push("read: skipped because the create phase produced no ids".to_owned());
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for failure in &failures {
            eprintln!("custodian-loadgen: FAILED {failure}");
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_parsing_accepts_absolute_and_relative_urls() {
        assert_eq!(
            patient_id_from_location("http://127.0.0.1:8080/Patient/abc-123/_history/1"),
            Some("abc-123")
        );
        assert_eq!(
            patient_id_from_location("Patient/a.b/_history/2"),
            Some("a.b")
        );
        assert_eq!(
            patient_id_from_location("/fhir/Patient/x1/_history/1"),
            Some("x1")
        );
        assert_eq!(patient_id_from_location("http://h/Patient/"), None);
        assert_eq!(patient_id_from_location("http://h/Patient/a?b"), None);
    }
}
