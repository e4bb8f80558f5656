//! A blocking client on tokio-postgres, for a store whose trait is synchronous.
//!
//! The `postgres` crate is such a client too, but it waits for each request's answer before
//! it sends the next, so a batch's writes and its `COMMIT` would be round trips of their own.
//! [`Transaction::commit_pipelined`] sends them all before it reads the first answer: a batch
//! is two round trips (the read, then the writes with the commit) instead of three.
//!
//! Each [`Client`] owns a current-thread tokio runtime on which its connection's task is
//! spawned. The runtime runs only while a call waits in `block_on`, which is when the
//! connection has work: sending the call's requests and reading their answers. A call must not
//! be made from inside an async runtime (keel-runtime calls the store from `spawn_blocking`),
//! and a client must not be dropped there either ([`crate::close_apart`]).

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use keel_core::StoreError;
use tokio::runtime::{Builder, Runtime};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Config, Error, Row, SimpleQueryMessage, Socket, Statement, ToStatement};

/// One connection, used synchronously.
pub(crate) struct Client {
    runtime: Runtime,
    inner: tokio_postgres::Client,
}

/// A parameter list, as tokio-postgres takes it.
pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Client {
    /// Connects as `config` says, through `tls`.
    pub(crate) fn connect<T>(config: &Config, tls: T) -> Result<Client, StoreError>
    where
        T: MakeTlsConnect<Socket> + Send + 'static,
        T::TlsConnect: Send,
        T::Stream: Send + 'static,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let runtime = Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io(format!("postgres: cannot start a client runtime: {e}")))?;
        let (inner, connection) = runtime
            .block_on(config.connect(tls))
            .map_err(crate::pg_error)?;
        runtime.spawn(async move {
            // The client sees the end too: its pending and later calls fail as closed.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres store: connection ended");
            }
        });
        Ok(Client { runtime, inner })
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub(crate) fn query<T>(&self, query: &T, params: Params<'_>) -> Result<Vec<Row>, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.block_on(self.inner.query(query, params))
    }

    pub(crate) fn query_one<T>(&self, query: &T, params: Params<'_>) -> Result<Row, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.block_on(self.inner.query_one(query, params))
    }

    pub(crate) fn execute<T>(&self, query: &T, params: Params<'_>) -> Result<u64, Error>
    where
        T: ?Sized + ToStatement,
    {
        self.block_on(self.inner.execute(query, params))
    }

    pub(crate) fn prepare(&self, query: &str) -> Result<Statement, Error> {
        self.block_on(self.inner.prepare(query))
    }

    /// Runs `statements` (separated by `;`) in the simple query protocol, stopping at the first
    /// that fails.
    pub(crate) fn batch_execute(&self, statements: &str) -> Result<(), Error> {
        self.block_on(self.inner.batch_execute(statements))
    }

    pub(crate) fn simple_query(&self, statements: &str) -> Result<Vec<SimpleQueryMessage>, Error> {
        self.block_on(self.inner.simple_query(statements))
    }

    /// Whether the connection is known to have ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Whether the server answers an empty query within `wait`.
    pub(crate) fn answers_within(&self, wait: Duration) -> bool {
        self.block_on(async {
            matches!(
                tokio::time::timeout(wait, self.inner.simple_query("")).await,
                Ok(Ok(_))
            )
        })
    }

    /// Begins a transaction with `begin` (`BEGIN …`).
    pub(crate) fn transaction(&mut self, begin: &str) -> Result<Transaction<'_>, Error> {
        self.batch_execute(begin)?;
        Ok(Transaction::begun(self))
    }
}

/// An open transaction, rolled back when dropped unless it was committed.
pub(crate) struct Transaction<'a> {
    client: &'a mut Client,
    open: bool,
}

/// A request of [`Transaction::commit_pipelined`].
pub(crate) enum Request<'a> {
    /// A prepared statement, with its parameters.
    Execute(&'a Statement, Params<'a>),
    /// Statements in the simple query protocol.
    Simple(String),
}

type Answer<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + 'a>>;

impl<'a> Transaction<'a> {
    /// A transaction that the caller has just begun on `client` (with a `BEGIN` sent with
    /// other statements): from here it is rolled back unless committed, even if the statements
    /// after the `BEGIN` failed.
    pub(crate) fn begun(client: &'a mut Client) -> Self {
        Transaction { client, open: true }
    }

    pub(crate) fn commit(mut self) -> Result<(), Error> {
        self.open = false;
        self.client.batch_execute("COMMIT")
    }

    /// Sends `requests` and then `COMMIT`, all before reading any answer, and returns `Ok` only
    /// if every one succeeded. A failed request aborts the transaction, and the server then
    /// answers the `COMMIT` by rolling back, so nothing is committed unless all succeeded. A
    /// request that fails before it is sent (a parameter that cannot be encoded) stops the
    /// sending: what was sent is answered, then the transaction is rolled back.
    pub(crate) fn commit_pipelined(mut self, requests: Vec<Request<'_>>) -> Result<(), Error> {
        let client = &self.client.inner;
        let commit = Request::Simple("COMMIT".into());
        // Still open until this returns: a panic while sending (a parameter's encoder) leaves
        // the transaction to `Drop`, which rolls it back.
        let result = self.client.block_on(async {
            let mut sent = Vec::new();
            let mut unsent = None;
            for request in requests.iter().chain(std::iter::once(&commit)) {
                let mut answer = answer(client, request);
                // tokio-postgres sends a request at its first poll, then waits for the answer.
                match std::future::poll_fn(|cx| Poll::Ready(answer.as_mut().poll(cx))).await {
                    Poll::Pending => sent.push(answer),
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => {
                        unsent = Some(e);
                        break;
                    }
                }
            }
            let mut first_error = None;
            for answer in sent {
                if let Err(e) = answer.await {
                    first_error.get_or_insert(e);
                }
            }
            if let Some(e) = unsent {
                // `COMMIT` was not sent: the transaction is still open.
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(first_error.unwrap_or(e));
            }
            first_error.map_or(Ok(()), Err)
        });
        // Ended either way: by the COMMIT (a rollback if anything failed), or by the ROLLBACK.
        self.open = false;
        result
    }
}

/// The answer to `request`, sent at its first poll.
fn answer<'c>(client: &'c tokio_postgres::Client, request: &'c Request<'c>) -> Answer<'c> {
    match request {
        Request::Execute(statement, params) => {
            Box::pin(async move { client.execute(*statement, params).await.map(drop) })
        }
        Request::Simple(statements) => Box::pin(client.batch_execute(statements)),
    }
}

impl Deref for Transaction<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client
    }
}

impl DerefMut for Transaction<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if self.open {
            // A broken connection fails this too, and is replaced at the next call.
            let _ = self.client.batch_execute("ROLLBACK");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::common::TestDb;

    fn count(client: &Client) -> i64 {
        client
            .query_one("SELECT count(*) FROM pipelined", &[])
            .unwrap()
            .get(0)
    }

    #[test]
    fn a_pipeline_commits_only_if_every_request_succeeded() {
        let Some(db) = TestDb::new() else { return };
        let mut client = crate::tls::connect(&db.config()).unwrap();
        client
            .batch_execute("CREATE TABLE pipelined (n int4 PRIMARY KEY)")
            .unwrap();
        let insert = client.prepare("INSERT INTO pipelined VALUES ($1)").unwrap();

        // Every request succeeds: all of it is committed.
        let tx = client.transaction("BEGIN").unwrap();
        let requests = vec![
            Request::Execute(&insert, &[&1_i32]),
            Request::Simple("INSERT INTO pipelined VALUES (2)".into()),
        ];
        tx.commit_pipelined(requests).unwrap();
        assert_eq!(count(&client), 2);

        // One fails in the server (a duplicate key) after one succeeded, and one more follows:
        // the COMMIT sent behind them rolls back.
        let tx = client.transaction("BEGIN").unwrap();
        let requests = vec![
            Request::Execute(&insert, &[&3_i32]),
            Request::Execute(&insert, &[&1_i32]),
            Request::Simple("INSERT INTO pipelined VALUES (4)".into()),
        ];
        let error = crate::pg_error(tx.commit_pipelined(requests).unwrap_err());
        assert!(error.to_string().contains("duplicate key"), "{error}");
        assert_eq!(count(&client), 2, "nothing of it was committed");

        // One fails before it is sent (a parameter of the wrong type): the rest, the COMMIT
        // too, is not sent, and what was is rolled back.
        let tx = client.transaction("BEGIN").unwrap();
        let requests = vec![
            Request::Simple("INSERT INTO pipelined VALUES (5)".into()),
            Request::Execute(&insert, &[&6_i64]),
            Request::Simple("INSERT INTO pipelined VALUES (7)".into()),
        ];
        let error = crate::pg_error(tx.commit_pipelined(requests).unwrap_err());
        assert!(error.to_string().contains("int4"), "{error}");
        assert_eq!(count(&client), 2, "nothing of it was committed");
        // The connection is outside any transaction: a statement on it commits by itself.
        client
            .batch_execute("INSERT INTO pipelined VALUES (8)")
            .unwrap();
        let other = crate::tls::connect(&db.config()).unwrap();
        assert_eq!(count(&other), 3, "seen from another session");
    }
}
