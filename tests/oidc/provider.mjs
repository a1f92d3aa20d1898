// A real OpenID provider for Custodian's integration tests: panva's oidc-provider (pinned in
// package.json), started by the Rust harness (tests/api/oidc.rs) on loopback. TEST HARNESS ONLY:
// it has fixed client secrets and a route that mints any user's token on request.
//
// Usage:
//   node tests/oidc/provider.mjs --port PORT --audience AUDIENCE [--audience AUDIENCE2 ...]
//                                --client-key-out PATH
//
//   --port 0 picks a free port. The issuer is http://127.0.0.1:PORT; the provider listens on
//   127.0.0.1 only and prints one line `READY <issuer>` on stdout once it answers (stdout gets
//   nothing else; notices and warnings go to stderr). It exits when its stdin closes, so a
//   harness that dies leaves no provider behind: run it with stdin open (a pipe or a terminal).
//   --audience: the FHIR server base URLs it issues access tokens for (resource indicators); the
//   first is the default resource when a token request names none.
//   --client-key-out: where to write the private key of client `ehr-jwt` (see below).
//
// The packages are loaded from the folder named by env CUSTODIAN_TEST_OIDC_DIR (where
// `npm ci` installed node_modules; scripts/test sets it), or else from this script's folder.
//
// What it issues:
//   - Signing keys: an RSA key (RS256) and a P-256 key (ES256), generated in memory at start;
//     their public halves are at the standard jwks_uri.
//   - Access tokens are JWTs (RFC 9068, `typ: at+jwt`) for any configured audience, signed RS256,
//     `aud` = the requested resource. A resource server's scopes are whatever the token request
//     asks for that is a SMART scope (v1 or v2, granular ones too) or a SMART/OIDC context scope;
//     anything else is dropped, as the provider does with scopes a resource server does not know.
//   - Clients (grant client_credentials only):
//       ehr-secret  client_secret_basic or client_secret_post, secret EHR_SECRET_CLIENT_SECRET;
//       ehr-jwt     private_key_jwt (RS256), with a key pair generated at start: its public JWK is
//                   registered, and a JSON file { kid, alg, private_jwk, private_key_pem } (PEM
//                   is PKCS#1) is written to --client-key-out so the test can sign assertions.
//     Their tokens carry the client's own claims (CLIENT_CLAIMS below) via extraTokenClaims.
//   - POST /test/mint: a user's access token without a browser login, see mintUserToken below.

import * as crypto from 'node:crypto';
import { writeFileSync } from 'node:fs';
import * as http from 'node:http';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

// stdout is the harness' channel and carries only the READY line: the provider's notices (it
// writes some with console.info) go to stderr like its warnings.
console.info = console.error;
console.log = console.error;

const { Provider, errors } = await importInstalled('oidc-provider');

/** The secret of client `ehr-secret` (tests/api/oidc.rs has the same). */
const EHR_SECRET_CLIENT_SECRET = 'custodian-test-ehr-secret-not-for-production';

/** The claims each client's own (client_credentials) tokens carry. */
const CLIENT_CLAIMS = {
  'ehr-secret': { roles: ['ehr-system'], tenant: 'default', purpose_of_use: 'TREAT' },
  'ehr-jwt': { roles: ['ehr-system'], tenant: 'default', purpose_of_use: 'TREAT' },
};

/** The client_id of minted user tokens: a registered client that never authenticates. */
const MINT_CLIENT_ID = 'test-user-client';

/** Lifetime of access tokens from the token endpoint, seconds. */
const ACCESS_TOKEN_TTL = 600;

/** Scopes allowed besides SMART resource scopes: SMART launch context and OpenID ones. */
const CONTEXT_SCOPES = new Set([
  'openid', 'fhirUser', 'profile', 'offline_access', 'online_access',
  'launch', 'launch/patient', 'launch/encounter',
]);

/**
 * A SMART resource scope: `patient|user|system / Type|* . permissions`, where permissions are
 * v2's `cruds` letters in order (at least one) or v1's read/write/*, and v2's granular
 * `?param=value&...` may follow.
 */
const SMART_RESOURCE_SCOPE = /^(patient|user|system)\/(\*|[A-Z][A-Za-z]*)\.(\*|read|write|(?=[cruds])c?r?u?d?s?)(\?\S+)?$/;

const options = parseOptions();
const signingKeys = [newKeyPair('rsa', 'RS256'), newKeyPair('ec', 'ES256')];
const clientKey = newKeyPair('rsa', 'RS256');
writeClientKey(options.clientKeyOut, clientKey);

// Listen first so that `--port 0` yields the port, which the issuer identifier contains.
const server = http.createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(options.port, '127.0.0.1', resolve);
});
const issuer = `http://127.0.0.1:${server.address().port}`;

/** Claims of tokens minted by /test/mint, by token: extraTokenClaims reads them there. */
const mintedClaims = new WeakMap();

const provider = new Provider(issuer, {
  jwks: { keys: signingKeys.map((key) => key.privateJwk) },
  clients: [
    {
      client_id: 'ehr-secret',
      client_secret: EHR_SECRET_CLIENT_SECRET,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      ...CLIENT_CLAIMS['ehr-secret'],
    },
    {
      client_id: 'ehr-jwt',
      token_endpoint_auth_method: 'private_key_jwt',
      token_endpoint_auth_signing_alg: 'RS256',
      jwks: { keys: [clientKey.publicJwk] },
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      ...CLIENT_CLAIMS['ehr-jwt'],
    },
    {
      // Only the client_id of minted tokens; its secret is random and never used.
      client_id: MINT_CLIENT_ID,
      client_secret: crypto.randomBytes(32).toString('base64url'),
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    },
  ],
  extraClientMetadata: { properties: ['roles', 'fhirUser', 'patient', 'tenant', 'purpose_of_use'] },
  features: {
    clientCredentials: { enabled: true },
    // No login pages: user tokens come from /test/mint.
    devInteractions: { enabled: false },
    introspection: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => options.audiences[0],
      getResourceServerInfo: (ctx, resource) => {
        if (!options.audiences.includes(resource)) {
          throw new errors.InvalidTarget(`unknown resource ${resource}`);
        }
        return resourceServerInfo(resource, allowedScopes(ctx.oidc.params.scope));
      },
    },
  },
  extraTokenClaims: (ctx, token) => mintedClaims.get(token) ?? clientClaims(token.clientId),
  ttl: {
    AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? ACCESS_TOKEN_TTL,
    ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? ACCESS_TOKEN_TTL,
  },
  // A test run has no use for cookies, but the provider wants keys to sign them.
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
});

// Routes the provider does not have are answered by the test routes before the provider's own.
provider.use(async (ctx, next) => {
  if (ctx.path === '/test/mint') {
    if (ctx.method !== 'POST') {
      ctx.status = 405;
      return;
    }
    try {
      ctx.body = await mintUserToken(await readJson(ctx.req));
    } catch (error) {
      ctx.status = 400;
      ctx.body = { error: 'invalid_request', error_description: error.message };
    }
    return;
  }
  await next();
});

server.on('request', provider.callback());
process.stdout.write(`READY ${issuer}\n`);

// The harness kills the process; a closed stdin (the harness died) ends it too.
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));

/**
 * POST /test/mint: a user's access token, as if that user had logged in through client
 * `test-user-client`. It is issued by the provider's own AccessToken model, so it is a real
 * access token of this provider: same signing key, kid, typ and claim layout as the token
 * endpoint's. Body (JSON), every member optional:
 *   sub (default "test-user"), roles, fhirUser, patient, scope, tenant, purpose_of_use:
 *     the claims, copied as given (scope is not filtered: tests may mint bad ones);
 *   expires_in (default 300): exp = now + expires_in, negative for an expired token;
 *   nbf_offset (default 0): nbf = now + nbf_offset, positive for a token not valid yet;
 *   aud (default the first --audience): any string, configured or not;
 *   alg (default RS256): RS256 or ES256, the provider key to sign with;
 *   any other member: an extra claim, copied as given (e.g. a roles claim of another name).
 * Answers { access_token, token_type, expires_in }.
 */
async function mintUserToken(body) {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw new TypeError('the body must be a JSON object');
  }
  const {
    sub = 'test-user', scope, expires_in: expiresIn = 300, nbf_offset: nbfOffset = 0,
    aud = options.audiences[0], alg = 'RS256', ...claims
  } = body;
  for (const [name, value] of Object.entries({ expires_in: expiresIn, nbf_offset: nbfOffset })) {
    if (!Number.isInteger(value)) throw new TypeError(`${name} must be an integer`);
  }
  if (!signingKeys.some((key) => key.alg === alg)) {
    throw new TypeError(`alg must be one of ${signingKeys.map((key) => key.alg).join(', ')}`);
  }

  const now = Math.floor(Date.now() / 1000);
  const token = new provider.AccessToken({
    accountId: sub,
    client: await provider.Client.find(MINT_CLIENT_ID),
    scope,
    resourceServer: new provider.ResourceServer(aud, resourceServerInfo(aud, scope ?? '', alg)),
    gty: 'urn:custodian:test:mint',
  });
  token.iat = now;
  token.exp = now + expiresIn;
  // The JWT format puts these claims in first, then its own (iss, sub, aud, exp, iat, jti,
  // client_id, scope), so a claim given here cannot replace those.
  mintedClaims.set(token, { ...claims, nbf: now + nbfOffset });
  return { access_token: await token.save(), token_type: 'Bearer', expires_in: expiresIn };
}

/** A resource server (the FHIR server at `audience`) that takes JWT access tokens. */
function resourceServerInfo(audience, scope, alg = 'RS256') {
  return {
    scope,
    audience,
    accessTokenTTL: ACCESS_TOKEN_TTL,
    accessTokenFormat: 'jwt',
    jwt: { sign: { alg } },
  };
}

/** The requested scopes the FHIR server may be granted, space-separated. */
function allowedScopes(requested) {
  return (requested ?? '')
    .split(' ')
    .filter((scope) => CONTEXT_SCOPES.has(scope) || SMART_RESOURCE_SCOPE.test(scope))
    .join(' ');
}

/** A client's own claims for its client_credentials tokens. */
function clientClaims(clientId) {
  return CLIENT_CLAIMS[clientId];
}

/** A new signing key pair: its private JWK (for the keystore) and public JWK, with kid and alg. */
function newKeyPair(type, alg) {
  const { privateKey, publicKey } = type === 'rsa'
    ? crypto.generateKeyPairSync('rsa', { modulusLength: 2048 })
    : crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const publicJwk = publicKey.export({ format: 'jwk' });
  const kid = `${alg.toLowerCase()}-${thumbprint(publicJwk)}`;
  const attributes = { kid, alg, use: 'sig' };
  return {
    alg,
    kid,
    privateKey,
    privateJwk: { ...privateKey.export({ format: 'jwk' }), ...attributes },
    publicJwk: { ...publicJwk, ...attributes },
  };
}

/** RFC 7638 thumbprint of a public JWK, base64url (a kid that is unique per key). */
function thumbprint(jwk) {
  const required = jwk.kty === 'RSA' ? ['e', 'kty', 'n'] : ['crv', 'kty', 'x', 'y'];
  const canonical = JSON.stringify(Object.fromEntries(required.map((name) => [name, jwk[name]])));
  return crypto.createHash('sha256').update(canonical).digest('base64url');
}

function writeClientKey(path, key) {
  const file = {
    kid: key.kid,
    alg: key.alg,
    private_jwk: key.privateJwk,
    private_key_pem: key.privateKey.export({ type: 'pkcs1', format: 'pem' }),
  };
  writeFileSync(path, `${JSON.stringify(file, null, 2)}\n`, { mode: 0o600 });
}

/** A request body as JSON, at most 64 KiB. */
async function readJson(request) {
  const chunks = [];
  let length = 0;
  for await (const chunk of request) {
    length += chunk.length;
    if (length > 64 * 1024) throw new RangeError('the body is over 64 KiB');
    chunks.push(chunk);
  }
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

function parseOptions() {
  const { values } = parseArgs({
    options: {
      port: { type: 'string' },
      audience: { type: 'string', multiple: true },
      'client-key-out': { type: 'string' },
    },
  });
  const port = Number(values.port);
  if (values.port === undefined || !Number.isInteger(port) || port < 0 || port > 65535) {
    usage('--port PORT is required (0 for a free port)');
  }
  if (!values.audience?.length) usage('at least one --audience is required');
  if (!values['client-key-out']) usage('--client-key-out PATH is required');
  return { port, audiences: values.audience, clientKeyOut: values['client-key-out'] };
}

function usage(problem) {
  process.stderr.write(`provider.mjs: ${problem}\nusage: node provider.mjs --port PORT `
    + '--audience AUDIENCE [--audience AUDIENCE ...] --client-key-out PATH\n');
  process.exit(2);
}

/**
 * Imports an npm package from CUSTODIAN_TEST_OIDC_DIR's node_modules (or this folder's), so the
 * packages may be installed outside the source tree.
 */
async function importInstalled(name) {
  const folder = process.env.CUSTODIAN_TEST_OIDC_DIR || dirname(fileURLToPath(import.meta.url));
  const resolved = createRequire(join(folder, 'package.json')).resolve(name);
  return import(pathToFileURL(resolved).href);
}
