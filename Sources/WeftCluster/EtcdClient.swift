#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore
import NIOPosix
import WeftProto

/// One key of etcd.
public struct KeyValue: Sendable, Equatable {
    public var key: String
    public var value: Data
    public var createRevision: Int64
    public var modRevision: Int64
    public var lease: Int64
}

/// A change seen by a watch. A deletion carries the key only.
public struct WatchEvent: Sendable, Equatable {
    public enum Kind: Sendable { case put, delete }
    public var kind: Kind
    public var keyValue: KeyValue
}

/// A client of etcd's v3 JSON gateway (etcd 3.4, Debian's `etcd-server`), over HTTP/1.1.
///
/// Guarantees: every call returns or throws within `requestTimeoutMs` (ETIMEDOUT) plus the
/// connect timeout (EIO "does not answer"); errors reported by etcd become EIO with its
/// message. Safe to call from many threads. Watches run until cancelled or broken; the caller
/// re-establishes them (`ClusterWatcher` does).
public final class EtcdClient: @unchecked Sendable {
    public let endpoint: String
    public let requestTimeoutMs: Int
    private let http: HTTPClient
    private let group: MultiThreadedEventLoopGroup

    /// `endpoint` is `http://HOST:PORT` (or `HOST:PORT`).
    public init(endpoint: String, requestTimeoutMs: Int = 5000) throws {
        var rest = Substring(endpoint)
        if rest.hasPrefix("http://") { rest = rest.dropFirst(7) }
        while rest.hasSuffix("/") { rest = rest.dropLast() }
        guard let colon = rest.lastIndex(of: ":"), let port = Int(rest[rest.index(after: colon)...]),
              (1...65535).contains(port), colon != rest.startIndex else {
            throw WeftError(EINVAL, "etcd endpoint must be http://HOST:PORT, got '\(endpoint)'")
        }
        self.endpoint = "http://\(rest)"
        self.requestTimeoutMs = requestTimeoutMs
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        http = HTTPClient(host: String(rest[..<colon]), port: port, group: group)
    }

    /// Ends the client: later calls fail with ESHUTDOWN (a renewal loop that has not seen its
    /// member leave yet, say), connects under way finish first, open watches end.
    public func close() {
        http.shutdown()
    }

    // MARK: Keys

    /// The value of `key`, if any, and the store revision the answer reflects.
    public func get(_ key: String) throws -> (KeyValue?, revision: Int64) {
        let reply = try call("/v3/kv/range", ["key": Self.b64(key)])
        return (try Self.keyValues(reply["kvs"]).first, Self.revision(reply))
    }

    /// Every key under `prefix`, in key order, and the store revision.
    public func list(prefix: String) throws -> ([KeyValue], revision: Int64) {
        let reply = try call("/v3/kv/range", ["key": Self.b64(prefix), "range_end": Self.b64(Self.prefixEnd(prefix))])
        return (try Self.keyValues(reply["kvs"]), Self.revision(reply))
    }

    @discardableResult
    public func put(_ key: String, _ value: Data, lease: Int64 = 0) throws -> Int64 {
        var body: [String: Any] = ["key": Self.b64(key), "value": value.base64EncodedString()]
        if lease != 0 { body["lease"] = String(lease) }
        return Self.revision(try call("/v3/kv/put", body))
    }

    public func delete(_ key: String) throws {
        _ = try call("/v3/kv/deleterange", ["key": Self.b64(key)])
    }

    /// Creates `key` only if it does not exist. Returns false, changing nothing, if it does.
    public func create(_ key: String, _ value: Data, lease: Int64 = 0) throws -> Bool {
        try transaction(compare: [Compare(key: key, createRevision: 0)], puts: [(key, value, lease)])
    }

    /// A condition of a transaction: `key`'s create revision (0: absent) or mod revision.
    public struct Compare {
        public var key: String
        public var createRevision: Int64?
        public var modRevision: Int64?

        public init(key: String, createRevision: Int64? = nil, modRevision: Int64? = nil) {
            self.key = key
            self.createRevision = createRevision
            self.modRevision = modRevision
        }
    }

    /// Applies every put atomically if every comparison holds; returns whether it did.
    public func transaction(compare: [Compare], puts: [(String, Data, Int64)]) throws -> Bool {
        let comparisons: [[String: Any]] = compare.map { condition in
            var entry: [String: Any] = ["key": Self.b64(condition.key), "result": "EQUAL"]
            if let create = condition.createRevision {
                entry["target"] = "CREATE"
                entry["create_revision"] = String(create)
            } else {
                entry["target"] = "MOD"
                entry["mod_revision"] = String(condition.modRevision ?? 0)
            }
            return entry
        }
        let success: [[String: Any]] = puts.map { key, value, lease in
            var put: [String: Any] = ["key": Self.b64(key), "value": value.base64EncodedString()]
            if lease != 0 { put["lease"] = String(lease) }
            return ["request_put": put]
        }
        let reply = try call("/v3/kv/txn", ["compare": comparisons, "success": success])
        return reply["succeeded"] as? Bool ?? false
    }

    // MARK: Leases

    /// Grants a lease of `ttlSeconds`; returns its id.
    public func grantLease(ttlSeconds: Int) throws -> Int64 {
        let reply = try call("/v3/lease/grant", ["TTL": ttlSeconds])
        guard let id = Self.int64(reply["ID"]), id != 0 else { throw WeftError(EIO, "etcd granted no lease: \(reply)") }
        return id
    }

    /// Renews lease `id`; returns the TTL left, 0 when the lease has expired.
    public func keepAlive(lease id: Int64) throws -> Int64 {
        let (status, data) = try http.post("/v3/lease/keepalive", body: try Self.json(["ID": String(id)]),
                                           timeoutMs: requestTimeoutMs)
        guard status == 200 else { throw WeftError(EIO, "etcd lease keepalive: HTTP \(status)") }
        // A stream of messages; the first answers this renewal.
        let first = data.split(separator: 0x0A).first ?? data[...]
        let object = try Self.object(Data(first))
        let result = object["result"] as? [String: Any] ?? object
        return Self.int64(result["TTL"]) ?? 0
    }

    public func revokeLease(_ id: Int64) throws {
        _ = try call("/v3/lease/revoke", ["ID": String(id)])
    }

    // MARK: Watch

    /// An open watch; `cancel()` ends it (its `onEnd` is then called with nil or an error).
    public final class Watch: @unchecked Sendable {
        fileprivate let stream: HTTPStream
        fileprivate init(stream: HTTPStream) { self.stream = stream }
        public func cancel() { stream.close() }
    }

    /// Watches every key under `prefix` from revision `fromRevision` on. `onEvents` gets each
    /// batch with the revision it brings the watcher to; `onEnd` is called once when the watch
    /// ends (compaction past `fromRevision` ends it with ESTALE: re-read and watch again).
    public func watch(prefix: String, fromRevision: Int64, onEvents: @escaping ([WatchEvent], Int64) -> Void,
                      onEnd: @escaping (Error?) -> Void) throws -> Watch {
        let request: [String: Any] = ["create_request": [
            "key": Self.b64(prefix), "range_end": Self.b64(Self.prefixEnd(prefix)), "start_revision": String(fromRevision),
        ]]
        var ended = false
        let finish: (Error?) -> Void = { error in
            guard !ended else { return }
            ended = true
            onEnd(error)
        }
        var stream: HTTPStream?
        stream = try http.stream("/v3/watch", body: try Self.json(request), onMessage: { line in
            guard let object = try? Self.object(line), let result = object["result"] as? [String: Any] else {
                if let object = try? Self.object(line), let error = object["error"] {
                    finish(WeftError(EIO, "etcd watch: \(error)"))
                    stream?.close()
                }
                return
            }
            if let compacted = Self.int64(result["compact_revision"]), compacted > 0 {
                finish(WeftError(ESTALE, "etcd compacted past revision \(fromRevision) (now \(compacted))"))
                stream?.close()
                return
            }
            if result["canceled"] as? Bool == true {
                finish(WeftError(EIO, "etcd cancelled the watch: \(result["cancel_reason"] ?? "")"))
                stream?.close()
                return
            }
            let header = result["header"] as? [String: Any] ?? [:]
            let revision = Self.int64(header["revision"]) ?? 0
            guard let events = result["events"] as? [[String: Any]] else { return }
            let decoded: [WatchEvent] = events.compactMap { event in
                guard let kv = event["kv"] as? [String: Any], let keyValue = try? Self.keyValue(kv) else { return nil }
                return WatchEvent(kind: (event["type"] as? String) == "DELETE" ? .delete : .put, keyValue: keyValue)
            }
            onEvents(decoded, revision)
        }, onEnd: finish)
        return Watch(stream: stream!)
    }

    // MARK: JSON plumbing

    private func call(_ path: String, _ body: [String: Any]) throws -> [String: Any] {
        let (status, data) = try http.post(path, body: try Self.json(body), timeoutMs: requestTimeoutMs)
        let object = (try? Self.object(data)) ?? [:]
        guard status == 200 else {
            let message = object["error"] as? String ?? object["message"] as? String ?? String(decoding: data, as: UTF8.self)
            throw WeftError(EIO, "etcd \(path): HTTP \(status): \(message)")
        }
        return object
    }

    static func json(_ object: [String: Any]) throws -> Data {
        try JSONSerialization.data(withJSONObject: object)
    }

    static func object(_ data: Data) throws -> [String: Any] {
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw WeftError(EIO, "etcd sent something other than a JSON object")
        }
        return object
    }

    static func b64(_ key: String) -> String { Data(key.utf8).base64EncodedString() }

    /// The smallest key greater than every key starting with `prefix`.
    static func prefixEnd(_ prefix: String) -> String {
        var bytes = Array(prefix.utf8)
        while let last = bytes.last {
            if last < 0xFF {
                bytes[bytes.count - 1] = last + 1
                return String(decoding: bytes, as: UTF8.self)
            }
            bytes.removeLast()
        }
        return "\0"
    }

    /// int64 fields come as JSON strings (protobuf mapping), sometimes as numbers.
    static func int64(_ value: Any?) -> Int64? {
        if let text = value as? String { return Int64(text) }
        if let number = value as? NSNumber { return number.int64Value }
        return nil
    }

    static func revision(_ reply: [String: Any]) -> Int64 {
        int64((reply["header"] as? [String: Any])?["revision"]) ?? 0
    }

    static func keyValues(_ value: Any?) throws -> [KeyValue] {
        guard let list = value as? [[String: Any]] else { return [] }
        return try list.map(keyValue)
    }

    static func keyValue(_ object: [String: Any]) throws -> KeyValue {
        guard let keyText = object["key"] as? String, let keyData = Data(base64Encoded: keyText) else {
            throw WeftError(EIO, "etcd sent a key that is not base64")
        }
        let value = (object["value"] as? String).flatMap { Data(base64Encoded: $0) } ?? Data()
        return KeyValue(key: String(decoding: keyData, as: UTF8.self), value: value,
                        createRevision: int64(object["create_revision"]) ?? 0,
                        modRevision: int64(object["mod_revision"]) ?? 0, lease: int64(object["lease"]) ?? 0)
    }
}
