#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import WeftProto

/// Whether a frame asks or answers.
public enum FrameKind: UInt8, Sendable {
    case request = 0
    case response = 1
    /// A request from the hub to the agent (`recall`); the agent answers with a response frame
    /// of the same opcode and id. Sent only on connections that enabled leases.
    case callback = 2
}

/// The fixed fields of a frame after its length prefix. A response echoes the opcode and request
/// id of the request it answers; `opcode` stays raw here so that a hub can answer an opcode it
/// does not know with ENOSYS.
public struct FrameHeader: Equatable, Sendable {
    public var kind: FrameKind
    public var opcode: UInt16
    public var requestID: UInt64

    public init(kind: FrameKind, opcode: UInt16, requestID: UInt64) {
        self.kind = kind; self.opcode = opcode; self.requestID = requestID
    }
}

/// One complete, validated frame: known version, kind and opcode, payload not yet decoded.
public struct Frame: Equatable, Sendable {
    public var kind: FrameKind
    public var opcode: HubOpcode
    public var requestID: UInt64
    public var payload: [UInt8]

    public init(kind: FrameKind, opcode: HubOpcode, requestID: UInt64, payload: [UInt8]) {
        self.kind = kind; self.opcode = opcode; self.requestID = requestID; self.payload = payload
    }
}

/// Weft's wire format (SPEC.md §Wire protocol):
///
///     u32 LE length of the rest | u8 version (1) | u8 kind | u16 LE opcode | u64 LE request id | payload
///
/// Decoders reject a length above `maxFrameBytes` before allocating anything, and reject unknown
/// versions, kinds and opcodes, short payloads and trailing bytes with a thrown `WeftError`
/// (EPROTO for framing, EBADMSG for payloads); they never trap on any input.
public enum WireCodec {
    /// The only protocol version this build speaks.
    public static let version: UInt8 = 2
    /// Bytes of the length prefix.
    public static let lengthPrefixBytes = 4
    /// Bytes after the length prefix and before the payload: version, kind, opcode, request id.
    public static let headerBytes = 12
    /// Largest value of the length prefix: the largest transfer plus room for its arguments.
    public static let maxFrameBytes = Limits.transferMaxBytes + 64 * 1024
    /// Longest string on the wire (agent names, error messages), in UTF-8 bytes.
    public static let stringMaxBytes = 4096

    // MARK: Pure encoding and decoding (no NIO), for tests and tools

    /// The complete frame of request `request` tagged with `id`.
    public static func encodeRequest(id: UInt64, _ request: HubRequest) -> [UInt8] {
        var head = ByteWriter(capacity: 128)
        let bulk = request.encodeHead(into: &head)
        return assemble(FrameHeader(kind: .request, opcode: request.opcode.rawValue, requestID: id), head.bytes, bulk)
    }

    /// The complete frame answering request `id` of `opcode`. A success must have the result
    /// shape of `opcode` (a programming error otherwise).
    public static func encodeResponse(id: UInt64, opcode: HubOpcode, _ result: Result<HubResponse, WeftError>) -> [UInt8] {
        encodeResponse(id: id, rawOpcode: opcode.rawValue, result)
    }

    static func encodeResponse(id: UInt64, rawOpcode: UInt16, _ result: Result<HubResponse, WeftError>) -> [UInt8] {
        var head = ByteWriter(capacity: 128)
        let bulk = encodeResponseHead(rawOpcode: rawOpcode, result, into: &head)
        return assemble(FrameHeader(kind: .response, opcode: rawOpcode, requestID: id), head.bytes, bulk)
    }

    /// Decodes one whole frame, length prefix included. `bytes` must hold exactly one frame.
    public static func decodeFrame(_ bytes: [UInt8]) throws -> Frame {
        try bytes.withUnsafeBytes { raw in
            guard raw.count >= lengthPrefixBytes else {
                throw WeftError(EPROTO, "frame of \(raw.count) bytes is shorter than its length prefix")
            }
            let length = try frameLength(prefix: raw)
            guard raw.count - lengthPrefixBytes == length else {
                throw WeftError(EPROTO, "frame announces \(length) bytes after its prefix but has \(raw.count - lengthPrefixBytes)")
            }
            let rest = UnsafeRawBufferPointer(rebasing: raw[lengthPrefixBytes...])
            let header = try decodeHeader(rest)
            guard let opcode = HubOpcode(rawValue: header.opcode) else { throw unknownOpcode(header.opcode) }
            return Frame(kind: header.kind, opcode: opcode, requestID: header.requestID,
                         payload: Array(rest[headerBytes...]))
        }
    }

    /// The request a request frame carries.
    public static func decodeRequest(_ frame: Frame) throws -> HubRequest {
        guard frame.kind != .response else { throw WeftError(EPROTO, "expected a request frame, got a response") }
        return try frame.payload.withUnsafeBytes { try decodeRequest(opcode: frame.opcode, payload: $0) }
    }

    /// The result a response frame carries: the hub's answer, or the error it returned.
    public static func decodeResponse(_ frame: Frame) throws -> Result<HubResponse, WeftError> {
        guard frame.kind == .response else { throw WeftError(EPROTO, "expected a response frame, got a request") }
        return try frame.payload.withUnsafeBytes { try decodeResponse(opcode: frame.opcode, payload: $0) }
    }

    // MARK: Building blocks shared with the NIO transport

    /// The length prefix at the start of `prefix` (at least 4 bytes), checked against the limits.
    static func frameLength(prefix: UnsafeRawBufferPointer) throws -> Int {
        precondition(prefix.count >= lengthPrefixBytes)
        var length: UInt32 = 0
        withUnsafeMutableBytes(of: &length) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: prefix[0..<4])) }
        return try checkedLength(UInt32(littleEndian: length))
    }

    static func checkedLength(_ length: UInt32) throws -> Int {
        guard Int(length) >= headerBytes else {
            throw WeftError(EPROTO, "frame length \(length) is shorter than the \(headerBytes)-byte header")
        }
        guard Int(length) <= maxFrameBytes else {
            throw WeftError(EPROTO, "frame length \(length) exceeds the \(maxFrameBytes)-byte limit")
        }
        return Int(length)
    }

    /// The header at the start of `bytes` (the frame after its length prefix).
    static func decodeHeader(_ bytes: UnsafeRawBufferPointer) throws -> FrameHeader {
        var reader = ByteReader(bytes)
        let version = try reader.u8()
        guard version == WireCodec.version else {
            throw WeftError(EPROTO, "wire protocol version \(version) is not supported (this build speaks \(WireCodec.version))")
        }
        let rawKind = try reader.u8()
        guard let kind = FrameKind(rawValue: rawKind) else { throw WeftError(EPROTO, "unknown frame kind \(rawKind)") }
        return FrameHeader(kind: kind, opcode: try reader.u16(), requestID: try reader.u64())
    }

    static func unknownOpcode(_ raw: UInt16) -> WeftError {
        WeftError(EPROTO, "unknown opcode \(raw)")
    }

    static func decodeRequest(opcode: HubOpcode, payload: UnsafeRawBufferPointer) throws -> HubRequest {
        var reader = ByteReader(payload)
        let request = try HubRequest.decode(opcode: opcode, from: &reader)
        guard reader.isAtEnd else { throw trailingBytes(reader.remaining, opcode) }
        return request
    }

    static func decodeResponse(opcode: HubOpcode, payload: UnsafeRawBufferPointer) throws -> Result<HubResponse, WeftError> {
        var reader = ByteReader(payload)
        let status = try reader.i32()
        let result: Result<HubResponse, WeftError>
        if status == 0 {
            result = .success(try HubResponse.decode(opcode: opcode, from: &reader))
        } else {
            guard status > 0 else { throw WeftError(EBADMSG, "negative status \(status) in \(opcode) response") }
            result = .failure(WeftError(status, try reader.string(max: stringMaxBytes)))
        }
        guard reader.isAtEnd else { throw trailingBytes(reader.remaining, opcode) }
        return result
    }

    static func trailingBytes(_ count: Int, _ opcode: HubOpcode) -> WeftError {
        WeftError(EBADMSG, "\(count) unexpected bytes after the \(opcode) payload")
    }

    /// Writes a response payload up to its bulk bytes (see `HubRequest.encodeHead`); returns those.
    static func encodeResponseHead(rawOpcode: UInt16, _ result: Result<HubResponse, WeftError>,
                                   into writer: inout ByteWriter) -> [UInt8]? {
        switch result {
        case .success(let response):
            precondition(HubOpcode(rawValue: rawOpcode).map(response.fits) ?? false,
                         "response \(response.shapeName) does not answer opcode \(rawOpcode)")
            writer.i32(0)
            return response.encodeHead(into: &writer)
        case .failure(let error):
            // errno 0 would read as success: a hub that throws it still reports a failure.
            writer.i32(error.errno > 0 ? error.errno : EIO)
            writer.blob(Array(error.message.utf8.prefix(stringMaxBytes)))
            return nil
        }
    }

    private static func assemble(_ header: FrameHeader, _ head: [UInt8], _ bulk: [UInt8]?) -> [UInt8] {
        let length = headerBytes + head.count + (bulk?.count ?? 0)
        var writer = ByteWriter(capacity: lengthPrefixBytes + length)
        writer.u32(UInt32(length))
        writer.u8(version); writer.u8(header.kind.rawValue); writer.u16(header.opcode); writer.u64(header.requestID)
        writer.raw(head)
        if let bulk { writer.raw(bulk) }
        return writer.bytes
    }
}
